"""``python -m grpo_lightning fit --config configs/sat_tiny.yaml`` (see ``cli.py``)."""

import sys

from .commands import run_extra


def main(argv: list[str] | None = None) -> int:
    code = run_extra(sys.argv[1:] if argv is None else list(argv))
    if code is not None:
        return code
    from .cli import main as cli_main  # torch and Lightning load only for fit / validate

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
