"""The REST service (Flask-smorest, OpenAPI) that serves several domains at once."""
