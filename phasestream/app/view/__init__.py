"""``phasestream view``: the web view of the results in Tiled, live (docs/cli.md, "view")."""

from phasestream.app.view.server import ViewServer, create_app, run_view

__all__ = ["ViewServer", "create_app", "run_view"]
