"""marshmallow schemas of every request and answer, and the one error schema."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from thali.core.names import NAME_RULE, VERSION_RULE

#: a ref: ``latest``, a version number (ASCII digits, optionally after ``v``) or an alias name
REF_RULE = f"^(latest|{VERSION_RULE.pattern}|{NAME_RULE.pattern})$"


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "machine-readable, e.g. not_found"})
    status = fields.Integer(required=True, metadata={"description": "the HTTP status"})
    message = fields.String(required=True, metadata={"description": "one line for people"})
    errors = fields.Dict(required=True, metadata={"description": "field -> problem, when fields are wrong"})


TOP_K = fields.Integer(validate=validate.Range(min=1, max=100), metadata={"description": "labels to return"})


class PredictQuerySchema(Schema):
    top_k = fields.Integer(
        validate=validate.Range(min=1, max=100), metadata={"description": "labels to return"}
    )
    explain = fields.Boolean(load_default=False, metadata={"description": "add a heatmap PNG (base64)"})


class StrictBoolean(fields.Boolean):
    """``true`` or ``false`` in a JSON body, nothing else (marshmallow's Boolean also takes 0, 1, "yes")."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, bool):
            raise ValidationError("Not a valid boolean.")
        return value


class PredictJSONSchema(Schema):
    image = fields.String(required=True, metadata={"description": "the image file's bytes, base64"})
    top_k = fields.Integer(validate=validate.Range(min=1, max=100))
    explain = StrictBoolean()


class BatchJSONSchema(Schema):
    images = fields.List(
        fields.String(), required=True, validate=validate.Length(min=1), metadata={"description": "base64"}
    )
    top_k = fields.Integer(validate=validate.Range(min=1, max=100))
    explain = StrictBoolean()


class UploadSchema(Schema):
    image = fields.Raw(required=True, metadata={"type": "string", "format": "binary"})


class BatchUploadSchema(Schema):
    images = fields.List(
        fields.Raw(metadata={"type": "string", "format": "binary"}),
        required=True,
        validate=validate.Length(min=1),
    )


class LabelSchema(Schema):
    label = fields.String(required=True)
    display_name = fields.String(required=True)
    class_id = fields.Integer(required=True)
    probability = fields.Float(required=True, metadata={"description": "calibrated (temperature-scaled)"})


class PredictionSchema(Schema):
    domain = fields.String(required=True)
    version = fields.Integer(required=True)
    variant = fields.String(required=True)
    predictions = fields.List(fields.Nested(LabelSchema), required=True)
    # marshmallow moves declared fields off the class, so this does not shadow Schema.unknown (the Meta
    # option); mypy reads the class body only
    unknown = fields.Boolean(  # type: ignore[assignment]
        required=True,
        metadata={"description": "not one of the domain's classes: unknown_score under unknown_threshold"},
    )
    unknown_threshold = fields.Float(allow_none=True, metadata={"description": "the package's threshold"})
    unknown_score = fields.Float(
        allow_none=True,
        metadata={
            "description": "knn_residual: the smaller margin of the package's two feature scores "
            "(k-NN similarity, share inside the training span) over their thresholds, below 0 = unknown; "
            "max_probability (packages without a feature score): the top calibrated probability"
        },
    )
    unknown_method = fields.String(
        allow_none=True, metadata={"description": "knn_residual or max_probability"}
    )
    cached = fields.Boolean(required=True, metadata={"description": "answered from the cache"})
    timings_ms = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)
    heatmap_png = fields.String(metadata={"description": "explain=true: PNG overlay, base64"})


class BatchResponseSchema(Schema):
    results = fields.List(fields.Nested(PredictionSchema), required=True)


class ClassSchema(Schema):
    name = fields.String(required=True)
    display_name = fields.String(required=True)


class DomainSchema(Schema):
    domain = fields.String(required=True)
    display_name = fields.String(required=True)
    description = fields.String(required=True)
    version = fields.Integer(required=True)
    ref = fields.String(required=True, metadata={"description": "what was asked for: alias, number, latest"})
    aliases = fields.List(fields.String(), required=True)
    variant = fields.String(required=True)
    backend = fields.String(required=True)
    provider = fields.String(required=True, metadata={"description": "execution provider that really runs"})
    explain = fields.Boolean(required=True)
    signed_by = fields.String(allow_none=True)
    top_k = fields.Integer(required=True)
    metrics = fields.Dict(
        required=True, metadata={"description": "the card's top1, top5, ece of the variant"}
    )
    licence = fields.String(required=True)
    classes = fields.List(fields.Nested(ClassSchema), required=True)
    loaded_at = fields.String(required=True)
    feedback = fields.Boolean(
        required=True, metadata={"description": "this server takes corrections (POST .../feedback)"}
    )


def register_manifest_schemas(spec: Any) -> None:
    """Put :class:`thali.core.manifest.Manifest` (and the models it uses) into the spec's components,
    generated from the pydantic models: the ``/card`` answer is documented field by field."""
    from thali.core.manifest import manifest_openapi_schemas

    for name, schema in manifest_openapi_schemas().items():
        spec.components.schema(name, component=schema)


class CardSchema(Schema):
    """The model card of the served version: what the registry stores in ``card.json``."""

    domain = fields.String(required=True)
    version = fields.Integer(required=True)
    variant = fields.String(required=True, metadata={"description": "the variant being served"})
    backend = fields.String(required=True)
    provider = fields.String(required=True)
    classes = fields.List(fields.Nested(ClassSchema), required=True)
    card = fields.Dict(
        required=True,
        metadata={
            "description": "the package's manifest (card.json): metrics per variant, gate verdicts, "
            "serving defaults, dataset, lineage",
            "allOf": [{"$ref": "#/components/schemas/Manifest"}],
        },
    )


class DomainListSchema(Schema):
    domains = fields.List(fields.Nested(DomainSchema), required=True)
    not_loaded = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class LoadSchema(Schema):
    ref = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Regexp(REF_RULE),
        metadata={"description": "version (3 or v3), alias, or latest (default: production)"},
    )
    variant = fields.String(
        load_default=None, allow_none=True, validate=validate.Regexp(f"^{NAME_RULE.pattern}$")
    )


class PluginsSchema(Schema):
    plugins = fields.List(fields.Dict(), required=True)
    blocked = fields.List(fields.String(), required=True)
    components = fields.Dict(required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True)
    domains = fields.Dict(required=True)
    watch = fields.Dict(
        metadata={"description": "with --watch: per domain the ref followed, last check, a refused version"}
    )


SHA256_RULE = r"^[0-9a-f]{64}$"


class FeedbackJSONSchema(Schema):
    image = fields.String(metadata={"description": "the photo's bytes, base64 (or image_sha256)"})
    image_sha256 = fields.String(
        validate=validate.Regexp(SHA256_RULE),
        metadata={"description": "a photo this server answered recently (instead of image)"},
    )
    label = fields.String(
        required=True,
        validate=validate.Length(min=1, max=100),
        metadata={"description": "the right class name of the domain, or none_of_these"},
    )
    note = fields.String(validate=validate.Length(max=500), load_default=None, allow_none=True)


class FeedbackUploadSchema(Schema):
    image = fields.Raw(metadata={"type": "string", "format": "binary"})
    image_sha256 = fields.String(metadata={"pattern": SHA256_RULE})
    label = fields.String(required=True)
    note = fields.String(metadata={"maxLength": 500})


class FeedbackRecordSchema(Schema):
    id = fields.String(required=True)
    domain = fields.String(required=True)
    label = fields.String(required=True, metadata={"description": "what the person said it is"})
    image_sha256 = fields.String(required=True)
    format = fields.String(required=True, metadata={"description": "the photo's decoded format"})
    model_version = fields.Integer(required=True, metadata={"description": "the version that answered"})
    variant = fields.String(required=True)
    answer_label = fields.String(required=True, metadata={"description": "what the model said"})
    answer_probability = fields.Float(required=True)
    answer_unknown = fields.Boolean(required=True)
    agreed = fields.Boolean(required=True, metadata={"description": "label is the model's answer"})
    note = fields.String(allow_none=True)
    created = fields.String(required=True)


class FeedbackCountSchema(Schema):
    agreed = fields.Integer(required=True)
    corrected = fields.Integer(required=True)


class FeedbackListSchema(Schema):
    domain = fields.String(required=True)
    total = fields.Integer(required=True, metadata={"description": "records the store holds"})
    counted = fields.Integer(required=True, metadata={"description": "the newest records listed and counted"})
    counts = fields.Dict(keys=fields.String(), values=fields.Nested(FeedbackCountSchema), required=True)
    records = fields.List(fields.Nested(FeedbackRecordSchema), required=True)


class FeedbackQuerySchema(Schema):
    limit = fields.Integer(load_default=200, validate=validate.Range(min=1, max=5000))
