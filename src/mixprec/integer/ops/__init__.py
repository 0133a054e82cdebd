"""Operator kernels over numpy arrays, exact as LiteRT's reference kernels (and the engine's own
integer layer norm and attentions): each a pure function of its inputs and a parameter record."""
