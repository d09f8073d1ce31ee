"""stowaway's benchmark (``python -m bench``); not part of the installed package."""
