"""The registered model's code: MLflow loads ``mf_pyfunc.py`` as models-from-code (no pickle)."""
