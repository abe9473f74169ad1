"""SmartGas publisher: a fleet of simulated gas-bottle meters that PUT readings to the consumer over CoAP."""

__version__ = "0.1.0"
