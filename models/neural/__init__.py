"""The neural family: Mult-DAE / Mult-VAE (Liang et al., WWW 2018) in numpy.

``network`` (parameters, forward, loss and hand-written gradients, safe save/load), ``training``
(minibatch Adam epochs on a users x items matrix), ``federated`` (FedAvg / FedAdam reference loop
over clients' matrices) and ``recommender`` (the servable model: score, recommend with reasons,
save, load).
"""
