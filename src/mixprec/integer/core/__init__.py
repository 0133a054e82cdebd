"""Number formats and fixed-point arithmetic the operators share: TFLite's rounding rules,
gemmlowp's fixed-point multipliers and functions, tensor quantization records, timing."""
