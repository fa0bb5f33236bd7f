"""`python -m clipkit.cli`."""
from clipkit.cli import entry

entry()
