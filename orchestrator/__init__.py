"""Ray Tune x Ray Train sweeps with MLflow tracking; the only package that imports ray and mlflow."""
