"""The fleet page's static files (``static/``), served by ``service.api.routes.fleet`` at ``/ui``."""
