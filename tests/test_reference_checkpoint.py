"""A trained model of the reference implementation (its checkpoint_best.pth layout: Swin
`vision_encoder`, BERT `text_encoder` whose last layers cross-attend, `vision_proj`, `text_proj`,
`sig_*_proj`, `itm_head`, `temp`, `temp2`, `lamba`) converted into the whole student gives the
reference's embeddings, teacher projections, ITM logits and scalars. The reference's forward is
assembled here from transformers' PyTorch Swin and BERT layers on the same random weights."""

import jax
import numpy as np
import pytest
from test_swin import hf_swin, release_state_dict

from rebalance_jax import convert
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import reference, towers, weights
from rebalance_jax.models.fusion import FusionConfig
from rebalance_jax.models.student import Student, StudentConfig, init_student, with_tower_weights
from rebalance_jax.models.towers import conversion
from rebalance_jax.models.towers.swin import SwinConfig
from rebalance_jax.models.towers.text import TextConfig

pytestmark = pytest.mark.slow  # parity with PyTorch / transformers, and the convert command

torch = pytest.importorskip("torch", reason="the reference's forward runs in PyTorch; install "
                            "the test extra (torch==2.13.0)")
transformers = pytest.importorskip("transformers")

WIDTH, HEADS, LAYERS, FUSION_START, EMBED, IMAGE_TEACHER, TEXT_TEACHER = 128, 4, 4, 2, 16, 24, 40


def _reference_model():
  torch.manual_seed(0)
  swin = hf_swin(64, 2, embed=16)  # final width 128, the BERT's: cross-attention keys take it
  config = transformers.BertConfig(vocab_size=99, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=96,
                                   max_position_embeddings=40, is_decoder=True,
                                   add_cross_attention=True, attn_implementation="eager")
  bert = transformers.BertModel(config, add_pooling_layer=False).eval()
  head = lambda i, o: torch.nn.Linear(i, o)
  heads = {"vision_proj": head(WIDTH, EMBED), "text_proj": head(WIDTH, EMBED),
           "sig_vision_proj": head(IMAGE_TEACHER, EMBED), "sig_text_proj": head(TEXT_TEACHER, EMBED),
           "itm_head": torch.nn.Sequential(head(WIDTH, 2 * WIDTH), torch.nn.LayerNorm(2 * WIDTH),
                                           torch.nn.GELU(), head(2 * WIDTH, 2))}
  with torch.no_grad():
    heads["itm_head"][1].weight.add_(torch.randn(2 * WIDTH) * 0.3)
  state = {f"vision_encoder.{k}": v for k, v in release_state_dict(swin).items()
           if not k.startswith("head.")}
  for name, value in bert.state_dict().items():  # only the fusion layers cross-attend
    layer = name.split(".")[2] if name.startswith("encoder.layer.") else None
    if "crossattention" in name and int(layer) < FUSION_START:
      continue
    state[f"text_encoder.{name}"] = value
  for prefix, module in heads.items():
    state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
  state.update(temp=torch.tensor(0.05), temp2=torch.tensor(0.09), lamba=torch.tensor(0.37))
  return swin, bert, heads, state


def _reference_forward(swin, bert, heads, images, ids, mask, image_teacher, text_teacher):
  """The reference's retrieval forward: image tokens [avg; Swin's], text = layers before the
  fusion, fusion = the rest cross-attending to the image tokens, ITM head on its [CLS]."""
  normalize = lambda x: torch.nn.functional.normalize(x, dim=-1)
  with torch.no_grad():
    out = swin(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    image = torch.cat([out.pooler_output[:, None], out.last_hidden_state], 1)
    key_mask = (1.0 - torch.from_numpy(mask)[:, None, None, :].float()) * -1e4
    x = bert.embeddings(input_ids=torch.from_numpy(ids))
    for layer in bert.encoder.layer[:FUSION_START]:
      x = layer(x, attention_mask=key_mask)[0]
    fused = x
    image_mask = torch.zeros(image.shape[0], 1, 1, image.shape[1])
    for layer in bert.encoder.layer[FUSION_START:]:
      fused = layer(fused, attention_mask=key_mask, encoder_hidden_states=image,
                    encoder_attention_mask=image_mask)[0]
    return {"v": normalize(heads["vision_proj"](image[:, 0])),
            "t": normalize(heads["text_proj"](x[:, 0])),
            "itm": heads["itm_head"](fused[:, 0]),
            "teacher_v": normalize(heads["sig_vision_proj"](torch.from_numpy(image_teacher))),
            "teacher_t": normalize(heads["sig_text_proj"](torch.from_numpy(text_teacher)))}


def _student(init: str) -> Student:
  return Student(StudentConfig(
      image=towers.TowerSpec("swin", SwinConfig(image_size=64, patch_size=4, embed_dim=16,
                                                depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4),
                                                window_size=2, drop_path=0.0)),
      text=towers.TowerSpec("text", TextConfig(vocab_size=99, max_tokens=12, width=WIDTH,
                                               depth=FUSION_START, num_heads=HEADS, mlp_dim=96)),
      fusion=FusionConfig(depth=LAYERS - FUSION_START, num_heads=HEADS, mlp_dim=96),
      embed_dim=EMBED, image_teacher_dim=IMAGE_TEACHER, text_teacher_dim=TEXT_TEACHER, init=init))


def test_reference_checkpoint_converts_to_the_same_student(tmp_path, capsys):
  swin, bert, heads, state = _reference_model()
  source = tmp_path / "checkpoint_best.pth"
  torch.save({"model": state, "config": {"image_res": 64, "embed_dim": EMBED}}, source)
  output = str(tmp_path / "student.safetensors")
  sections = convert.run("reference", str(source), output,
                         conversion.Options(max_tokens=12, num_heads=HEADS)).sections
  printed = capsys.readouterr().out
  # The teacher widths the file's U_v, U_t take, and the vocabulary: notes, not flags to paste.
  assert (f"and teachers whose features are {IMAGE_TEACHER}-wide (image) and {TEXT_TEACHER}-wide "
          "(text)") in printed
  assert "and --config.tokenizer.vocab_file=PATH, PATH being the reference's bert vocab.txt" in printed
  assert "<" not in printed.split("use it with: ")[1].splitlines()[0]
  # The fields travel with the file: evaluate --weights reads them.
  assert weights.saved_fields(output)["model.fusion"] == {"depth": 2, "num_heads": 4, "mlp_dim": 96}
  # The head count is not in the weights: never guessed.
  with pytest.raises(InputError, match=r"does not record its BERT's attention heads; pass "
                                       r"--num_heads"):
    convert.run("reference", str(source), output, conversion.Options(max_tokens=12))
  assert sections["model.fusion"] == {"depth": 2, "num_heads": 4, "mlp_dim": 96}
  assert sections["model.text"]["depth"] == 2 and sections["model"] == {"embed_dim": EMBED}
  assert sections["model.image"]["window_size"] == 2
  model = _student(output)
  params = with_tower_weights(model, init_student(model, jax.random.key(0)))

  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
  ids = rng.integers(1, 99, size=(3, 12)).astype(np.int32)
  mask = np.ones((3, 12), np.int32)
  mask[1, 7:] = 0
  image_teacher = rng.normal(size=(3, IMAGE_TEACHER)).astype(np.float32)
  text_teacher = rng.normal(size=(3, TEXT_TEACHER)).astype(np.float32)
  expected = _reference_forward(swin, bert, heads, images, ids, mask, image_teacher, text_teacher)

  apply = lambda method, *args: model.apply({"params": params}, *args, method=method)
  image, v = apply(Student.encode_image, images)
  text, t = apply(Student.encode_text, ids, mask)
  itm = apply(Student.itm_logits, apply(Student.fuse, text.tokens, mask, image.tokens, image.mask))
  teacher_v, teacher_t = apply(Student.project_teachers, image_teacher, text_teacher)
  for name, ours in (("v", v), ("t", t), ("itm", itm), ("teacher_v", teacher_v),
                     ("teacher_t", teacher_t)):
    np.testing.assert_allclose(ours, expected[name].numpy(), rtol=1e-5, atol=2e-5, err_msg=name)
  scalars = apply(Student.scalars)
  np.testing.assert_allclose([scalars[k] for k in ("temp", "temp2", "lam")], [0.05, 0.09, 0.37],
                             rtol=1e-6)


def test_reference_checkpoint_names_are_checked(tmp_path):
  _, _, _, state = _reference_model()
  tensors = {k: v.float().numpy() for k, v in state.items()}
  with pytest.raises(InputError, match=r"1 tensors match no rule of the format: image_queue"):
    reference.convert_reference({**tensors, "image_queue": np.zeros((4, 16))}, 64, 12, HEADS)
  del tensors["lamba"]
  with pytest.raises(InputError, match=r"has nothing for the student's \['lam'\]"):
    reference.convert_reference(tensors, 64, 12, HEADS)
  weights.save_safetensors(str(tmp_path / "other.safetensors"), {"temp": np.zeros(())})
  model = _student(str(tmp_path / "other.safetensors"))
  with pytest.raises(InputError, match=r"config.model.init=.*missing \("):
    with_tower_weights(model, init_student(model, jax.random.key(0)))
