"""The emulator's Dataverse Web API v9.2: routes (api), reads and change tracking (query), writes, metadata, $batch."""
