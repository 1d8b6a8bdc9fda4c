"""The registered model's code for MLflow's own loaders (``mlflow models serve``,
``mlflow.pyfunc.load_model``): one models-from-code entry file, fedrec/serving/pyfunc.py, that
reads the saved state (no pickle).

fedrec itself never runs these files from the artifact store: ``fedrec recommend``/``predict`` and
the training flow download only the state files and read them with the installed classes
(``tasks.tracking.load_recommender``). Whoever serves with MLflow executes the stored file and so
trusts whoever can write to the registry and its artifacts.
"""
