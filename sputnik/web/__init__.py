"""The web chat's server side: accounts, sessions, sign-in with OIDC, and conversations kept in a database."""
