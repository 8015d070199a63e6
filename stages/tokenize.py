"""tokenize: corpus -> artifacts/tokenize/data/{train,val}_*.bin, tokenizer.model, manifest.json."""

from pgolf import corpus, paths, stage
from pgolf.config import load_params
from pgolf.errors import PgolfError
from pgolf.io import atomic_dir


def main() -> dict:
    cfg = load_params().data
    with atomic_dir(paths.TOKENIZED, "tokenize/data") as tmp:
        try:
            return corpus.tokenize(cfg, tmp)
        except PgolfError as e:  # name files where they will be, not in the temporary folder about to go
            raise PgolfError(str(e).replace(str(tmp), str(paths.TOKENIZED))) from None


if __name__ == "__main__":
    stage.run(main, "tokenize")
