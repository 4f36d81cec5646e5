"""Runtime: wires protocol, decoding, records and delivery into cycles and the run loop."""
