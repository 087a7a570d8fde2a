"""The recipes' error type: bad input or a failed run is one `error:` line and exit status 2, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class RecipeError(Exception):
    """A problem with the user's input or run; reported as one `error:` line and exit status 2, no traceback."""


def run_main(main: Callable[[], None]) -> None:
    """Run a recipe's `main`, turning a `RecipeError` into one clear message and a non-zero exit."""
    try:
        main()
    except RecipeError as exc:
        # Every process hits the same input error; one message is enough.
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
