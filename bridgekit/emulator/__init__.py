"""The local tenant emulator: Entra ID token service, Dataverse Web API v9.2 and Microsoft Graph v1.0 over HTTPS.

An independent implementation of the documented protocols (see ``shared/reference/protocols.md``): it
imports nothing from bridgekit's client side (auth, http, odata, dataverse, graph, sync, warehouse).

One HTTPS server on 127.0.0.1 serves every service under its own path prefix::

    https://127.0.0.1:<port>/<tenant>/...             Entra ID v2 (discovery, token, devicecode, keys)
    https://127.0.0.1:<port>/org/api/data/v9.2/...    Dataverse Web API   (dataverse_url = <base>/org)
    https://127.0.0.1:<port>/graph/v1.0/...           Microsoft Graph     (graph_url = <base>/graph)
    https://127.0.0.1:<port>/_emulator/...            admin: mutate, faults, reset, apps (admin key)

Layout of the package:
    store.py      versioned SQLite record store shared by both services
    schema.py     Dataverse tables / Graph resources as data
    synth.py      the deterministic synthetic company (and its planted defects)
    activity.py   live activity (mutate)
    identity.py   token service, JWT signing and validation
    tls.py        local CA and server certificate
    dataverse/    Dataverse Web API: api.py (routes), common.py (errors, Prefer, annotations), query.py
                  (reads, paging, change tracking), write.py, metadata.py, batch.py ($batch multipart)
    graph/        Microsoft Graph: api.py (routes), query.py ($select/$top/$orderby/$filter, paging, delta)
    odata_filter.py  $filter -> SQL with bound parameters (shared by both services)
    faults.py     fault injection and service-protection limits
    context.py    per-server state: store, settings, apps, token validation
    app.py        the Starlette app;  process.py: start/stop/status/serve;  cli.py: `bridgekit emulator`
"""
