"""Half-precision islands: float16 / bfloat16 formats, their operators, the bridges to and from
affine int8, and pipelines that join integer graphs and islands."""
