"""The control plane: reads each model's load, decides its replica count, and acts through Ray Serve or
Kubernetes. Only this package imports `kubernetes`."""
