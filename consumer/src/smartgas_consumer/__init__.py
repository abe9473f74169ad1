"""SmartGas consumer: CoAP ingest → validation → gas physics → durable SQLite store (→ sinks)."""

__version__ = "0.1.0"
