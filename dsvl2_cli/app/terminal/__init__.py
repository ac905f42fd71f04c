"""The terminal front: the Typer commands, their options, exit codes and rendering."""
