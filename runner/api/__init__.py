"""The Apify API v2 over HTTP: one shared transport (`client.ApiClient`) and the small resource clients on it.

The request queue (`runner.queue.api.ApiQueue`) and the dataset sink (`runner.results.apify.ApiDataset`) live
beside their Protocols; the key-value store and the run (`resources`) are here.
"""

from runner.api.client import ApiClient, ApiClientOptions, ApiRetryPolicy, CallTimeouts, RateLimits
from runner.api.resources import ActorRun, KeyValueStore

__all__ = ["ActorRun", "ApiClient", "ApiClientOptions", "ApiRetryPolicy", "CallTimeouts", "KeyValueStore", "RateLimits"]
