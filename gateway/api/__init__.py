"""Servicers: thin adapters from protocol messages to the pipeline and back."""
