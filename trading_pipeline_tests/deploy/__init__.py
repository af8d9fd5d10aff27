"""Production deployment: docker-compose.yml, Dockerfile and deploy/, tested without a Docker engine."""
