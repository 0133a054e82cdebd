"""The topologies the examples run: the keyword spotter and the encoder stacks."""
