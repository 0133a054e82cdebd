"""Tables, CSV/JSON and plots of measured results."""
