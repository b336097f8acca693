"""Signalbox server side: ingestion, the event log, processing and serving."""

__version__ = "0.1.0"
