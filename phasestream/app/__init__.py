"""The application: live service, stack supervision, the command line, the demo."""
