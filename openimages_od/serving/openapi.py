"""The OpenAPI 3 document served at ``/openapi.json`` (hand-written to match app.py's handlers)."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]


def _error(desc: str) -> dict[str, Any]:
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_BOX = {
    "type": "object",
    "required": ["x0", "y0", "x1", "y1"],
    "properties": {k: {"type": "number"} for k in ("x0", "y0", "x1", "y1")},
}


def openapi_document(model_name: str = "oiod", auth: bool = False) -> dict[str, Any]:
    """Build the document.

    Args:
        model_name: the name accepted in ``/v1/models/{name}`` (an enum, so clients and
            property-based tests know the valid value).
        auth: whether bearer auth is on (adds the security scheme).
    """
    errors = {
        "400": _error(
            "Invalid request (bad JSON, bad field, not an image, not an allowed URL or output name)"
        ),
        "403": _error(
            "The image URL points at a refused (private, loopback, metadata) address, or is an "
            "s3:// URL outside serve.allowed_image_prefixes"
        ),
        "408": _error("The request body did not arrive within serve.body_timeout_s"),
        "409": _error("The output name clashes with an existing folder or file"),
        "413": _error("Body, image or pixel count over the limit"),
        "415": _error("Unsupported Content-Type or image format"),
        "422": _error("The image URL could not be fetched (missing and unreadable objects alike)"),
        "503": _error("Model not loaded yet, shutting down, or all workers of a step busy (Retry-After)"),
        "504": _error("Fetching the image, checking, drawing or storing it timed out"),
    }
    if auth:
        errors["401"] = _error("Missing or wrong bearer token")
    detect_request = {
        "type": "object",
        "required": ["image"],
        "additionalProperties": False,
        "properties": {
            "image": {
                "type": "string",
                "minLength": 1,
                "description": "http(s):// URL, s3:// URL (only under serve.allowed_image_prefixes), "
                "data: URI, or base64 of JPEG/PNG bytes.",
            },
            "min_score": {"type": "number", "minimum": 0, "maximum": 1},
            "max_detections": {"type": "integer", "minimum": 1, "maximum": 1000},
            "draw": {"type": "boolean", "description": "Return the image with boxes drawn."},
            "format": {"type": "string", "enum": ["jpeg", "png"], "description": "Drawn image format."},
            "output": {
                "type": "string",
                "maxLength": 512,
                "description": "Store the drawn image under serve.output_dir (400 when the server has "
                "none): a relative name of [A-Za-z0-9_.-] parts not starting with '.', "
                "at most 8 deep, ending in .jpg, .jpeg or .png.",
            },
        },
    }
    options_params = [
        {"name": "min_score", "in": "query", "schema": {"type": "number", "minimum": 0, "maximum": 1}},
        {
            "name": "max_detections",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        {"name": "draw", "in": "query", "schema": {"type": "boolean"}},
        {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["jpeg", "png"]}},
    ]
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "openimages-od detection service",
            "version": "1",
            "description": "Object detection with a TF Model Garden RetinaNet trained on Open Images. "
            'Errors are always {"error": {"code", "message"}}.',
        },
        "paths": {
            "/v1/detect": {
                "post": {
                    "summary": "Detect objects in one image",
                    "description": "JSON body (object or a bare URL string), multipart/form-data with an 'image' "
                    "part, or a raw image/* body with options as query parameters. With draw=true "
                    "the annotated image is returned base64 in 'image', or raw when Accept asks "
                    "for image/* only.",
                    "parameters": options_params,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"oneOf": [detect_request, {"type": "string", "minLength": 1}]}
                            },
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": {"type": "string", "format": "binary"},
                                        "min_score": {"type": "number"},
                                        "max_detections": {"type": "integer"},
                                        "draw": {"type": "boolean"},
                                        "format": {"type": "string", "enum": ["jpeg", "png"]},
                                    },
                                }
                            },
                            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Detections sorted by score",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/DetectResponse"}
                                },
                                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                                "image/png": {"schema": {"type": "string", "format": "binary"}},
                            },
                        },
                        **errors,
                    },
                }
            },
            "/v1/models/{name}:predict": {
                "post": {
                    "summary": "TF Serving REST predict (serving_default, image_bytes)",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": [model_name, "default"]},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["instances"],
                                    "properties": {
                                        "signature_name": {"type": "string", "enum": ["serving_default"]},
                                        "instances": {
                                            "type": "array",
                                            "minItems": 1,
                                            "items": {
                                                "oneOf": [
                                                    {"$ref": "#/components/schemas/B64"},
                                                    {
                                                        "type": "object",
                                                        "required": ["image_bytes"],
                                                        "properties": {
                                                            "image_bytes": {
                                                                "$ref": "#/components/schemas/B64"
                                                            }
                                                        },
                                                    },
                                                ]
                                            },
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Raw model outputs per instance",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["predictions"],
                                        "properties": {
                                            "predictions": {
                                                "type": "array",
                                                "items": {"$ref": "#/components/schemas/Prediction"},
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        "404": _error("No such model"),
                        **errors,
                    },
                }
            },
            "/v1/models/{name}": {
                "get": {
                    "summary": "TF Serving model status",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": [model_name, "default"]},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Status",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["model_version_status"],
                                        "properties": {
                                            "model_version_status": {
                                                "type": "array",
                                                "items": {"type": "object"},
                                            }
                                        },
                                    }
                                }
                            },
                        },
                        "404": _error("No such model"),
                        "503": _error("Not ready"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Alive",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (model loaded)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Ready",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "503": _error("Not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
                "B64": {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string"}}},
                "Detection": {
                    "type": "object",
                    "required": ["label", "mid", "class_id", "score", "box", "box_normalized"],
                    "properties": {
                        "label": {"type": "string"},
                        "mid": {"type": "string"},
                        "class_id": {"type": "integer"},
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                        "box": _BOX,
                        "box_normalized": _BOX,
                    },
                },
                "DetectResponse": {
                    "type": "object",
                    "required": ["width", "height", "detections", "model"],
                    "properties": {
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "num_detections": {"type": "integer"},
                        "detections": {"type": "array", "items": {"$ref": "#/components/schemas/Detection"}},
                        "model": {"type": "object"},
                        "image": {"type": "string", "description": "base64 drawn image (draw=true)"},
                        "image_format": {"type": "string"},
                        "output": {"type": "string", "description": "where the drawn image was stored"},
                        "timing_ms": {"type": "number"},
                    },
                },
                "Prediction": {
                    "type": "object",
                    "properties": {
                        "detection_boxes": {
                            "type": "array",
                            "items": {"type": "array", "items": {"type": "number"}},
                        },
                        "detection_classes": {"type": "array", "items": {"type": "integer"}},
                        "detection_scores": {"type": "array", "items": {"type": "number"}},
                        "num_detections": {"type": "integer"},
                    },
                },
            }
        },
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
