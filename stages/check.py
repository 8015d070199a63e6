"""check: params.yaml as a whole (every key, range and choice) and the inputs it names, before any work.

A stage of its own so that any edit of params.yaml, even one no stage reads (a misspelled section), is checked.
"""

from pathlib import Path

from pgolf import corpus, data, export, paths, stage
from pgolf.config import load_params
from pgolf.errors import PgolfError
from pgolf.io import write_json


def main() -> None:
    params = load_params()
    d = params.data
    if d.source == "jsonl":
        data.corpus_files(d.paths)
    if d.tokenizer:
        data.load_tokenizer(d.tokenizer)
    if d.source == "fineweb" and d.fineweb_mirror and not Path(d.fineweb_mirror).is_dir():
        raise PgolfError(f"data.fineweb_mirror: {d.fineweb_mirror} is not a folder")
    corpus.SOURCES.lookup(d.source, "data.source")
    export.model_budget(params)  # a limit that leaves the model no room, before hours of training
    write_json(paths.CHECKED, {"params.yaml": "valid"})  # constant: a valid edit invalidates no stage
    print("check: params.yaml is valid")


if __name__ == "__main__":
    stage.run(main, "check")
