"""Privacy mechanisms: user-level differential privacy and its accountant (``dp.py``), the final
evaluation as a DP release (``released_metrics.py``), the budget ledger across runs
(``ledger.py``), secure aggregation (``secagg_plus*.py``, Shamir sharing, identity keys,
fixed-point encoding, its wire format) and credential redaction.

Threat model (README, "Threat model: who learns what, in each mode"):

- the server (coordinator), honest-but-curious: without secure aggregation it sees every client's
  upload; with it, only sums of at least t clients (t a majority of the round, at least 2), with
  round keys signed by each client's long-term identity key so that a server substituting keys is
  caught. Under DP each upload (or, with secure aggregation, each sum of a quorum) carries the
  full calibrated noise: (epsilon, delta) user-level DP against the server. Secure aggregation
  alone hides an update within one round's sum only: sums over different client sets across
  rounds (a dropout, or a server that leaves a client out) can be solved for one client's update,
  so sampled rounds are refused with it unless DP bounds what the sums say;
- readers of MLflow and other clients: see the model and the logged metrics: (epsilon, delta)
  under DP for all of them. The final evaluation is a counted release (``released_metrics.py``):
  each user's evaluation sums are bounded, each client adds Gaussian noise from OS entropy to its
  own upload (evaluation uploads are not securely aggregated, so each carries the full noise,
  against the server too), and the accountant composes it, and the champion's evaluation when
  there is one, with the training rounds; the training's noise is calibrated so that the whole
  composition meets the run's epsilon. Per-client metrics are post-processing of those noisy
  uploads, and the promotion rule skips its worst-client test under DP;
- colluding clients can remove their own noise shares from a secure sum, so the guarantee is
  stated against the server alone;
- across runs, the ledger (``ledger.py``) adds up what each user has spent and refuses a run
  that would take any of its users past their cap, whoever else takes part; users are named in
  it by a keyed hash whose secret stays with the coordinator, so readers of MLflow see how many
  users each private run had and which runs shared users, not who they are. The ledger is the
  coordinator's own record: it binds an operator who reruns, renames or pads the data, not one
  who discards the store and its secret.

All noise and sampling coins of a private run come from the operating system's entropy, never
from the run's (logged) seed.
"""
