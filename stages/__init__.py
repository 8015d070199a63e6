"""One thin script per pipeline stage, run as `python -m stages.<name>` by dvc.yaml."""
