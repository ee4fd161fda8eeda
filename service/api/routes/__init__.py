"""The API routes, one module per resource; each only parses, calls a service module or store, and maps errors."""
