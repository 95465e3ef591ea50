"""Stand-ins for Google's network edge: the APIs that cannot be reached from the test machine.

Only the services are faked. The clients that call them, the real ``gcloud`` CLI and the real
Cloud SQL Python Connector, run unchanged and are pointed at these stand-ins on 127.0.0.1.
"""
