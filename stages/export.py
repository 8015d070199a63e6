"""export: the run as a challenge submission -> artifacts/export/ (train_gpt.py, blob, submission.json, README, logs)."""

from pgolf import export, paths, stage
from pgolf.config import load_params


def main() -> None:
    script = export.export_run(load_params(choices=False), paths.EXPORT)
    print(f"export: {script} ({script.stat().st_size:,} bytes), final_model.blob, submission.json, README.md")


if __name__ == "__main__":
    stage.run(main, "export")
