"""A small HTTP client of Forge's API, as a user's script drives it (stdlib urllib, no proxy).

    result = webui.txt2img({"prompt": "...", "steps": 6, "width": 64, "height": 64, "seed": 1})
    result.images[0]            # PIL images: the generated ones, then extra ones (e.g. FreeFuse's mask picture)
    result.infotexts[0]         # info["infotexts"]; result.info is the whole parsed `info` JSON
    webui.png_info(result.png[0])["parameters"]

Non-200 answers raise WebuiError (status and response body) unless `check=False`.
Forge needs "hr_additional_modules" with enable_hr; txt2img adds ["Use same choices"] when it is missing.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, PngImagePlugin

FAILURE_SCRIPT = "FreeFuse test failure"


class WebuiError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, body: str):
        self.status, self.body = status, body
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:4000]}")


@dataclass
class GenerationResult:
    status: int
    body: dict[str, Any] = field(repr=False)

    @property
    def png(self) -> list[str]:
        """The images as the API sent them (base64 PNG, with the infotext in the 'parameters' chunk)."""
        return list(self.body.get("images") or [])

    @property
    def images(self) -> list[Image.Image]:
        return [decode_image(b64) for b64 in self.png]

    @property
    def info(self) -> dict[str, Any]:
        info = self.body.get("info")
        return json.loads(info) if isinstance(info, str) and info else {}

    @property
    def infotexts(self) -> list[str]:
        return list(self.info.get("infotexts") or [])

    @property
    def extra_generation_params(self) -> dict[str, Any]:
        return dict(self.info.get("extra_generation_params") or {})

    @property
    def error(self) -> str:
        """The body of a failed call (check=False): Forge's error JSON, as text."""
        return json.dumps(self.body) if self.status != 200 else ""


def decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def encode_image(image: Image.Image) -> str:
    """PNG base64 of `image`, keeping its text chunks (the infotext), for img2img or png-info."""
    meta = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        if isinstance(key, str) and isinstance(value, str):
            meta.add_text(key, value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=meta)
    return base64.b64encode(out.getvalue()).decode("ascii")


class WebuiClient:
    def __init__(self, url: str, timeout: float = 900.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body: Any = None, check: bool = True) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(req, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        text = raw.decode("utf-8", errors="replace")
        if check and status != 200:
            raise WebuiError(method, path, status, text)
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, {"text": text}

    def get(self, path: str) -> Any:
        return self.request("GET", path)[1]

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})[1]

    # ------------------------------------------------------------------ generation
    def txt2img(self, payload: dict[str, Any], check: bool = True) -> GenerationResult:
        payload = dict(payload)
        if payload.get("enable_hr"):
            payload.setdefault("hr_additional_modules", ["Use same choices"])
        status, body = self.request("POST", "/sdapi/v1/txt2img", payload, check=check)
        return GenerationResult(status, body if isinstance(body, dict) else {"body": body})

    def img2img(self, payload: dict[str, Any], check: bool = True) -> GenerationResult:
        """`init_images` may hold PIL images; they are sent as PNG base64."""
        payload = dict(payload)
        payload["init_images"] = [encode_image(i) if isinstance(i, Image.Image) else i for i in payload["init_images"]]
        status, body = self.request("POST", "/sdapi/v1/img2img", payload, check=check)
        return GenerationResult(status, body if isinstance(body, dict) else {"body": body})

    def png_info(self, image: Image.Image | str) -> dict[str, Any]:
        """/sdapi/v1/png-info of a PIL image or a base64 PNG: {"info": text, "items": {...}, "parameters": {...}}."""
        b64 = encode_image(image) if isinstance(image, Image.Image) else image
        return self.post("/sdapi/v1/png-info", {"image": b64})

    # ------------------------------------------------------------------ settings and listings
    def options(self) -> dict[str, Any]:
        return self.get("/sdapi/v1/options")

    def set_options(self, **options: Any) -> None:
        self.post("/sdapi/v1/options", options)

    def checkpoints(self) -> list[str]:
        """Checkpoint names without extension (flux_a, flux_a_Q8_0, sdxl_a, ...)."""
        return [m["model_name"] for m in self.get("/sdapi/v1/sd-models")]

    def modules(self) -> list[str]:
        """Separate VAE / text-encoder files (forge_additional_modules choices), by file name."""
        return [m["model_name"] for m in self.get("/sdapi/v1/sd-modules")]

    def loras(self) -> list[str]:
        return [lora["name"] for lora in self.get("/sdapi/v1/loras")]

    def scripts(self) -> dict[str, list[str]]:
        return self.get("/sdapi/v1/scripts")

    def select_model(
        self, checkpoint: str, modules: list[str] | tuple[str, ...] = (), unet_storage_dtype: str = "Automatic"
    ) -> None:
        """Make `checkpoint` (with these separate VAE/text-encoder files and this 'Diffusion in Low Bits' choice,
        e.g. 'float8-e4m3fn') the model of the next generations. Forge only re-reads the loading parameters
        when the checkpoint or the modules change, so a change of storage dtype alone goes through another
        checkpoint first. The model itself loads lazily, at the next generation."""
        current = self.options()
        wanted = {
            "forge_unet_storage_dtype": unet_storage_dtype,
            "forge_additional_modules": list(modules),
            "sd_model_checkpoint": checkpoint,
        }
        same_files = current.get("sd_model_checkpoint", "").split(".")[0] == checkpoint.split(".")[0] and sorted(
            _basename(m) for m in current.get("forge_additional_modules") or []
        ) == sorted(modules)
        if same_files and current.get("forge_unet_storage_dtype") != unet_storage_dtype:
            other = next(c for c in self.checkpoints() if c != checkpoint.split(".")[0])
            self.set_options(sd_model_checkpoint=other)
        self.set_options(**wanted)


def _basename(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]
