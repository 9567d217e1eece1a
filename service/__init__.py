"""The running process: settings, app, REST API, dispatcher, image steps, blobs, auth, CLI."""
