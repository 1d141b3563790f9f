//! The OpenAPI 3 document served at `GET /openapi.json`, written by hand.

use serde_json::{json, Value};

fn err_ref() -> Value {
    json!({ "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn errors(codes: &[&str]) -> serde_json::Map<String, Value> {
    codes.iter().map(|c| (c.to_string(), err_ref())).collect()
}

fn with(mut base: serde_json::Map<String, Value>, ok: (&str, Value)) -> Value {
    base.insert(ok.0.into(), ok.1);
    Value::Object(base)
}

fn body(schema: &str, required: bool) -> Value {
    json!({ "required": required, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn json_resp(desc: &str, schema: Value) -> Value {
    json!({ "description": desc, "content": { "application/json": { "schema": schema } } })
}

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// The document.
pub fn document() -> Value {
    let id_param =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let no_content = json!({ "description": "Done" });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "stasis sandbox lifecycle API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Create, pause, resume, list and kill sandboxes. Compatible with the lifecycle calls of the novita-sandbox / E2B SDKs."
        },
        "components": {
            "securitySchemes": { "ApiKeyAuth": { "type": "apiKey", "in": "header", "name": "X-API-KEY" } },
            "schemas": {
                "Error": { "type": "object", "required": ["code", "message"], "properties": {
                    "code": { "type": "integer" }, "message": { "type": "string" } } },
                "NewSandbox": { "type": "object", "properties": {
                    "templateID": { "type": "string", "default": "base" },
                    "timeout": { "type": "integer", "minimum": 0, "default": 300, "description": "seconds" },
                    "metadata": { "type": "object", "additionalProperties": { "type": "string" } },
                    "envVars": { "type": "object", "additionalProperties": { "type": "string" } },
                    "autoPause": { "type": "boolean", "default": false },
                    "autoResume": { "type": "object", "properties": { "enabled": { "type": "boolean" } } },
                    "lifecycle": r("Lifecycle"),
                    "secure": { "type": "boolean" },
                    "allowInternetAccess": { "type": "boolean" } } },
                "Lifecycle": { "type": "object", "properties": {
                    "onTimeout": { "type": "string", "enum": ["kill", "pause"] },
                    "autoResume": { "type": "boolean" } } },
                "ConnectSandbox": { "type": "object", "properties": { "timeout": { "type": "integer", "minimum": 0 } } },
                "ResumedSandbox": { "type": "object", "properties": {
                    "timeout": { "type": "integer", "minimum": 0 }, "autoPause": { "type": "boolean" } } },
                "TimeoutBody": { "type": "object", "required": ["timeout"], "properties": { "timeout": { "type": "integer", "minimum": 0 } } },
                "Sandbox": { "type": "object", "required": ["sandboxID", "templateID", "clientID", "envdVersion"], "properties": {
                    "sandboxID": { "type": "string" }, "templateID": { "type": "string" },
                    "clientID": { "type": "string" }, "envdVersion": { "type": "string" },
                    "alias": { "type": "string" }, "domain": { "type": "string", "nullable": true } } },
                "ListedSandbox": { "type": "object", "required": ["sandboxID", "templateID", "clientID", "startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "state", "envdVersion"], "properties": {
                    "sandboxID": { "type": "string" }, "templateID": { "type": "string" },
                    "clientID": { "type": "string" }, "alias": { "type": "string" },
                    "startedAt": { "type": "string", "format": "date-time" },
                    "endAt": { "type": "string", "format": "date-time", "description": "running: when the timeout fires; paused: end of retention" },
                    "cpuCount": { "type": "integer" }, "memoryMB": { "type": "integer" }, "diskSizeMB": { "type": "integer" },
                    "state": { "type": "string", "enum": ["running", "paused"] },
                    "envdVersion": { "type": "string" },
                    "metadata": { "type": "object", "additionalProperties": { "type": "string" } } } },
                "SandboxDetail": { "allOf": [ r("ListedSandbox"), { "type": "object", "properties": {
                    "domain": { "type": "string", "nullable": true },
                    "allowInternetAccess": { "type": "boolean" },
                    "lifecycle": r("Lifecycle"),
                    "stasis": { "type": "object", "properties": {
                        "guestRound": { "type": "integer", "nullable": true, "description": "the test guest's round, read from the guest: from the running VM, or while paused from the status page in its snapshot's memory" },
                        "pausedAtRound": { "type": "integer", "nullable": true, "description": "the round the worker read from the stopped guest at its last pause" },
                        "workerPid": { "type": "integer", "nullable": true },
                        "createdAt": { "type": "string", "format": "date-time" },
                        "snapshotBytes": { "type": "integer", "nullable": true, "description": "while paused: bytes allocated on disk to the snapshot's files (st_blocks * 512; holes in the sparse memory file cost nothing), its parent layers included" },
                        "snapshotLayers": { "type": "integer", "description": "memory layers of the last pause's snapshot: 1 full, 1 + parents for an incremental pause" },
                        "lastPauseBytes": { "type": "integer", "description": "bytes allocated on disk to the last pause's own layer" },
                        "lastPauseMemoryBytes": { "type": "integer", "description": "guest memory page bytes the last pause's layer stores (VM backend)" },
                        "snapshotApparentBytes": { "type": "integer", "nullable": true, "description": "while paused: the apparent size of the snapshot's files (sum of their lengths)" },
                        "busy": { "type": "string", "nullable": true } } } } } ] }
            }
        },
        "security": [ { "ApiKeyAuth": [] } ],
        "paths": {
            "/health": { "get": { "summary": "Liveness", "security": [], "responses": { "200": { "description": "OK" } } } },
            "/openapi.json": { "get": { "summary": "This document", "security": [], "responses": { "200": { "description": "OK" } } } },
            "/sandboxes": {
                "post": { "summary": "Create a sandbox", "requestBody": body("NewSandbox", false),
                    "responses": with(errors(&["400", "401", "429", "500"]), ("201", json_resp("Created", r("Sandbox")))) },
                "get": { "summary": "List running sandboxes (v1)",
                    "parameters": [ { "name": "metadata", "in": "query", "schema": { "type": "string" } } ],
                    "responses": with(errors(&["400", "401"]), ("200", json_resp("Running sandboxes", json!({ "type": "array", "items": r("ListedSandbox") })))) }
            },
            "/v2/sandboxes": { "get": { "summary": "List sandboxes, newest first, paginated",
                "parameters": [
                    { "name": "state", "in": "query", "description": "running, paused, comma-separated or repeated; default both", "schema": { "type": "array", "items": { "type": "string", "enum": ["running", "paused"] } }, "style": "form", "explode": false },
                    { "name": "metadata", "in": "query", "description": "URL-encoded k=v&k2=v2", "schema": { "type": "string" } },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 100 } },
                    { "name": "nextToken", "in": "query", "schema": { "type": "string" } } ],
                "responses": with(errors(&["400", "401"]), ("200", json!({ "description": "A page; the next page's token is in the x-next-token header",
                    "headers": { "x-next-token": { "schema": { "type": "string" } } },
                    "content": { "application/json": { "schema": { "type": "array", "items": r("ListedSandbox") } } } }))) } },
            "/sandboxes/{id}": {
                "parameters": id_param.clone(),
                "get": { "summary": "Get a sandbox", "responses": with(errors(&["401", "404"]), ("200", json_resp("The sandbox", r("SandboxDetail")))) },
                "delete": { "summary": "Kill a sandbox (running or paused)", "responses": with(errors(&["401", "404"]), ("204", no_content.clone())) }
            },
            "/sandboxes/{id}/pause": { "parameters": id_param.clone(), "post": { "summary": "Pause (snapshot to disk)",
                "responses": with(errors(&["401", "404", "409", "500"]), ("204", no_content.clone())) } },
            "/sandboxes/{id}/connect": { "parameters": id_param.clone(), "post": { "summary": "Connect; resumes a paused sandbox",
                "requestBody": body("ConnectSandbox", false),
                "responses": with(with(errors(&["400", "401", "404", "429", "500"]).into_iter().collect(), ("200", json_resp("Was running; timeout only extended", r("Sandbox")))).as_object().cloned().unwrap_or_default(),
                    ("201", json_resp("Was paused and got resumed; timeout reset", r("Sandbox")))) } },
            "/sandboxes/{id}/resume": { "parameters": id_param.clone(), "post": { "summary": "Resume (deprecated; use connect)", "deprecated": true,
                "requestBody": body("ResumedSandbox", false),
                "responses": with(errors(&["400", "401", "404", "409", "429", "500"]), ("201", json_resp("Resumed", r("Sandbox")))) } },
            "/sandboxes/{id}/timeout": { "parameters": id_param, "post": { "summary": "Set the timeout of a running sandbox, from now",
                "requestBody": body("TimeoutBody", true),
                "responses": with(errors(&["400", "401", "404", "409"]), ("204", no_content)) } }
        }
    })
}
