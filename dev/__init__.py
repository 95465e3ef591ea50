"""Tools for working on the service on one's own machine; none of it is deployed."""
