"""pointflow: a point-cloud classification service as plain Python, driven by Airflow."""

__version__ = "0.1.0"
