"""Continual-learning analysis over finished runs: bootstrap confidence intervals over evaluation samples and
over seeds/orders (``stats``), tidy tables and CSV/LaTeX/Markdown/JSON export (``tables``), plots (``plots``),
cross-domain transfer (``transfer``), re-running cells of a run (``verify``), task orders (``orders``) and the
CI regression against a committed reference (``regression``).
"""
