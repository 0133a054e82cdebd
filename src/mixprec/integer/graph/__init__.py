"""Graphs of operator nodes over numbered tensors: the nodes, the graph that runs them and the
exact-arithmetic simulation that attributes rounding error to each operator."""
