"""Get the model: repo addresses, the verified download and the repo check (standard library only)."""
