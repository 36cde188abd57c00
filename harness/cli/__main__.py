"""``python -m harness.cli`` (how ``accelerate launch -m harness.cli`` starts each process): the ``memgen-bench``
app."""

from harness.cli import app

if __name__ == "__main__":  # pragma: no cover
    app()
