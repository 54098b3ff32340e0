"""The review station: `leukograph review`, a local web application over the result database (see app.py)."""
