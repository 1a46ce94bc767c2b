"""Declarative policies: the route catalog, contracts, policies and app bindings."""
