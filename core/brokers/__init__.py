"""Broker adapters behind one ``Broker`` protocol (simulated now; Alpaca in paper/live)."""
