"""users: accounts, password hashes, profiles, the follow graph and token-signing keys."""
