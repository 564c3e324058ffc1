"""``debian-en``: a corpus of English documentation, books and dictionaries from Debian 12.

Installed by ``poetx data install debian-en`` (or on first use of ``--data debian-en``):

1. every package of :data:`SOURCES` is fetched at its pinned version with ``apt-get download``
   and its sha256 checked (:mod:`poetx.data.debian`); verified ``.deb`` files stay in
   ``<cache>/downloads/debian/``, so copying them there installs offline;
2. each package's text files are read and cleaned (:mod:`poetx.data.debdocs`);
3. documents are de-duplicated across all packages, exactly and near-exactly
   (:mod:`poetx.data.dedup`);
4. each document goes to validation when the hash of its id falls below ``VAL_FRACTION``
   (deterministic, by document), and the documents of each split are put in a fixed order
   shuffled by the hash of their ids, so any prefix of the training stream mixes all sources;
5. a byte-level BPE tokenizer of ``VOCAB_SIZE`` is trained on a spread sample of the training
   text (:func:`poetx.data.tokenizer.train_tokenizer`), and both splits are tokenized into
   ``tokens/train.u16.bin`` and ``tokens/val.u16.bin`` (memory-mapped by ``--data``).

The folder ``<cache>/corpora/debian-en-<BUILD>/`` holds ``text/{train,val}.jsonl`` (one
``{"id", "text"}`` a line), ``tokenizer.json``, ``tokens/``, ``manifest.json`` (sources,
licences, counts, sha256 of every output) and the ``.complete`` marker, written last after an
atomic rename of the whole folder. Every licence below lets the text be copied and used; each
package's ``/usr/share/doc/<name>/copyright`` has the details.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from poetx.atomic import write_with
from poetx.data.cache import resolve_cache_dir
from poetx.data.debdocs import DocRules, package_documents
from poetx.data.debian import DebPin, fetch_deb, sha256_file
from poetx.data.dedup import deduplicate
from poetx.data.tokenizer import TOKENIZER_FILE, train_tokenizer

NAME = "debian-en"
BUILD = "1"  # bump when the pins, the cleaning or the split change
EXTRACT_VERSION = "1"  # bump when poetx.data.debdocs reads a package differently
VAL_FRACTION = 0.01
VOCAB_SIZE = 32000
TOKENIZER_SAMPLE_CHARS = 60_000_000
MARKER = ".complete"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DebSource:
    """One pinned package, the files read from it and its licence."""

    pin: DebPin
    licence: str
    rules: DocRules


def _src(name: str, version: str, sha256: str, licence: str, *include: str,
         exclude: tuple[str, ...] = (), chunk_chars: int | None = None,
         fortune: bool = False) -> DebSource:
    rules = DocRules(include=include, exclude=exclude, fortune=fortune,
                     **({"chunk_chars": chunk_chars} if chunk_chars else {}))
    return DebSource(DebPin(name, version, sha256), licence, rules)


# Filled from `apt-cache show` of Debian 12 (bookworm) main; sha256 of the .deb file.
SOURCES: tuple[DebSource, ...] = (
    _src("linux-doc-6.1", "6.1.192-3",
         "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f",
         "GPL-2", '/usr/share/doc/linux-doc-6.1/html/'),
    _src("python3.11-doc", "3.11.2-6+deb12u9",
         "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
         "PSF-2.0", '/usr/share/doc/python3.11/html/'),
    _src("perl-doc", "5.36.0-7+deb12u4",
         "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8",
         "GPL-1+ or Artistic", '/usr/share/perl/', exclude=('perluniprops|perltoc',)),
    _src("postgresql-doc-15", "15.20-0+deb12u1",
         "4c44bf2c599f208b3f46454a6cf7a72e25ec46ff74d37b59dd31ad76b00eebb7",
         "PostgreSQL", '/usr/share/doc/postgresql-doc-15/'),
    _src("debian-handbook", "11.20220922",
         "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
         "GPL-2+ or CC-BY-SA-3.0", '/usr/share/doc/debian-handbook/html/en-US/'),
    _src("debian-reference-en", "2.100",
         "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
         "GPL-2+", '/usr/share/'),
    _src("developers-reference", "12.18",
         "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e",
         "GPL-2", '/usr/share/'),
    _src("abs-guide", "10-4",
         "2432950da65e559b986f593c09a6d0dd6bc9f3bea83fa115774791066108ecd9",
         "public domain", '/usr/share/doc/abs-guide/html/'),
    _src("cfi-en", "3.0-10.2",
         "a080fc8f3b1a36c645b22f769fec4acc2f0cded42bcc5d5865c846845c897da2",
         "verbatim copying permitted", '/usr/share/doc/cfi-en/'),
    _src("gimp-help-en", "2.10.34-2",
         "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36",
         "GFDL-1.2 (no invariant sections)", '/usr/share/gimp/2.0/help/en/'),
    _src("gnucash-docs", "4.13-1",
         "09979baf0ff8ddc1f9c39320c2c38ff606d6f4656e04742ff2dc51f2d562996f",
         "GFDL-1.1+ (no invariant sections) or GPL-2+", '/usr/share/help/C/'),
    _src("gnome-user-docs", "43.0-2",
         "0d635a840747958ca84da778b40d341f1155603851f922c9a171f5a181d6a39f",
         "CC-BY-SA-3.0", '/usr/share/help/C/'),
    _src("mate-user-guide", "1.26.0-1",
         "34d11899bcaa51619a6b574178b5bd79e5f6c6dd7a25debf57d095f2ea51ccfd",
         "GFDL-1.1+ (no invariant sections)", '/usr/share/help/C/'),
    _src("libreoffice-help-en-us", "4:7.4.7-1+deb12u14",
         "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
         "MPL-2.0", '/usr/share/libreoffice/help/en-US/'),
    _src("git-doc", "1:2.39.5-0+deb12u3",
         "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
         "GPL-2", '/usr/share/doc/git-doc/'),
    _src("bash-doc", "5.2.15-2",
         "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b",
         "GFDL-1.3 (no invariant sections) / GPL-3+", '/usr/share/'),
    _src("zsh-doc", "5.9-4",
         "79bd75df4bf03d1021e993fd773f82b8a4c8d76649e420cd32eca940cf418ff4",
         "zsh licence (MIT-like)", '/usr/share/'),
    _src("vim-doc", "2:9.0.1378-2+deb12u2",
         "6a7e9419d1e249ab5eabd4753bf600e807ccd564dbd9621d0fb90fa30d25e36d",
         "Vim licence", '/usr/share/'),
    _src("nodejs-doc", "18.20.4+dfsg-1~deb12u3",
         "d2fbd4f3aecccea9d901a03842ef8380379e0d33010a48af5e797ed68ae874ce",
         "Expat", '/usr/share/doc/nodejs/'),
    _src("ruby3.1-doc", "3.1.7+really3.1.2-0+deb12u1",
         "3dd9e79a155455fdee705e4e11d8307857cb54638f4b60e33e45af4364b5cb02",
         "Ruby or BSD-2-clause", '/usr/share/'),
    _src("python-django-doc", "3:3.2.25-0+deb12u7",
         "87307f067916df72e17180d35b7cde5c7ea6080336cda518efd7f6e66988a7ca",
         "BSD-3-clause", '/usr/share/'),
    _src("sphinx-doc", "5.3.0-4",
         "1da3d08bb3a0bc82a4b8b8109410e223054bf5fb13904557ec8ea869046f65b4",
         "BSD-2-clause", '/usr/share/'),
    _src("twisted-doc", "22.4.0-4+deb12u1",
         "3bc8d4e8965911289e4fb0efe017a56b48f07f1ae450b7071c432aeb41559142",
         "Expat", '/usr/share/'),
    _src("python-flask-doc", "2.2.2-3",
         "0659f6a04b15fe3f907150cadc0399fe987c790e722e001b73f7e49fa5ecca15",
         "BSD-3-clause", '/usr/share/'),
    _src("python-sqlalchemy-doc", "1.4.46+ds1-1",
         "8805c3167ef75278ac6fd58ed9856321c2b2e3a7e441edba84b2eb955216d0fd",
         "Expat", '/usr/share/'),
    _src("python-scipy-doc", "1.10.1-2",
         "a237fdcef1675622f1a5d8a291c64feba140615130ee625554f94772d4ea3ad7",
         "BSD-3-clause", '/usr/share/'),
    _src("python-sklearn-doc", "1.2.1+dfsg-1",
         "4e244556326064e87e7563e3e544c2288d44b5719db2d7b3a85c9a84ae93488d",
         "BSD-3-clause", '/usr/share/'),
    _src("python-pandas-doc", "1.5.3+dfsg-2",
         "4998405ff6b12432f46594963e95554ade1104705795428396345fca58d853f8",
         "BSD-3-clause", '/usr/share/'),
    _src("python-statsmodels-doc", "0.13.5+dfsg-7",
         "4167a3e13347343b9f0a6677fc804ecad80dd735d17bc051829610f6f1bc2afb",
         "BSD-3-clause", '/usr/share/'),
    _src("python-sympy-doc", "1.11.1-1",
         "2a1d50bd49738f0280308fc8d86d5fa5739dbc6391e1c754f4549bc3635e6a31",
         "BSD-3-clause", '/usr/share/'),
    _src("python-astropy-doc", "5.2.1-2+deb12u1",
         "d7cfa77ec5239a4ebcdf27c7cdc3d9e604228e99257f91d4260abbb970469b91",
         "BSD-3-clause", '/usr/share/'),
    _src("python-dask-doc", "2022.12.1+dfsg-2",
         "81fc4cc36bfc939ed9ff28c2423d921909cfbef1af69055131b79ab69a33b615",
         "BSD-3-clause", '/usr/share/'),
    _src("python-skimage-doc", "0.19.3-8",
         "2c87d8f7d4504b29fe80283a24a153fb4175b0e4964bd90a2a0152b36bb6b468",
         "BSD-3-clause", '/usr/share/'),
    _src("python-biopython-doc", "1.80+dfsg-4",
         "350b871fa68e73e7dee78d6affec8a27bcbb31cd690843a82aefe187dab1712f",
         "Biopython licence (BSD-3-clause-like)", '/usr/share/', exclude=('/Tests/',)),
    _src("sagemath-doc", "9.5-6",
         "dae42f803878fe655dd4627b3ddaa74de82a737a6076527d3441e80018ab2b12",
         "GPL-2+", '/usr/share/doc/sagemath/html/en/'),
    _src("erlang-doc", "1:25.2.3+dfsg-1+deb12u4",
         "7d172cecfdd9c2930b27c776ad226ffcc84670375cf830c79ee41c6944e8a1c8",
         "Apache-2.0", '/usr/share/'),
    _src("racket-doc", "8.7+dfsg1-1",
         "d50139b4bf806cd280bd18146ca2e7579cede5da23cc7f5c663044596af4e00f",
         "Apache-2.0 or Expat", '/usr/share/'),
    _src("ghc-doc", "9.0.2-4",
         "a7c77e36c8906f82eef411ceeba13b7d663b7766a5ecc6659e3405889e0429c9",
         "BSD-3-clause", '/usr/share/'),
    _src("rust-doc", "1.63.0+dfsg1-2",
         "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b",
         "Apache-2.0 or Expat", '/usr/share/', exclude=('/html/src/',)),
    _src("openjdk-17-doc", "17.0.21.1+2-1~deb12u1",
         "3e04db24dbcb31d598774973998f1d8212e3424e288befbfef235077325f841d",
         "GPL-2 with Classpath exception", '/usr/share/'),
    _src("qtbase5-doc-html", "5.15.8+dfsg-11+deb12u3",
         "e052497a7db970f002807e3543043c11e46135641b8284b0a419086ba64f5f47",
         "GFDL-1.3 (no invariant sections)", '/usr/share/'),
    _src("wx3.2-doc", "3.2.2+dfsg-2",
         "15f1d1d13b57ce424e9837f7ab16903ab06b3f10bd054aa163e99a8b41fc62b3",
         "wxWindows Library Licence", '/usr/share/'),
    _src("libstdc++-12-doc", "12.2.0-14+deb12u1",
         "cdfc497c07975678b6145df159bf62587023fcec9d603db06c75547328887dbd",
         "GPL-3+ with GCC runtime exception", '/usr/share/'),
    _src("libboost1.81-doc", "1.81.0-5+deb12u1",
         "da1e2182ea8955cf6155924066dd611588f855aebf961d0ea0e7ac0092216ebb",
         "BSL-1.0", '/usr/share/'),
    _src("cmake-doc", "3.25.1-1",
         "6e805a758ffed87cc7ea234cf0a7a1bb8ae78b93d8b5783e7fb989a6320f8133",
         "BSD-3-clause", '/usr/share/'),
    _src("llvm-16-doc", "1:16.0.6-15~deb12u1",
         "6f2323357bad4aa2942bf815a8d1ced18fb808746583faeee28e0dc9238112da",
         "Apache-2.0 with LLVM exception", '/usr/share/'),
    _src("dpdk-doc", "22.11.11-0+deb12u1",
         "92063e97024c09c1d50bc4e1f57a09115c4d78d7c8e83cf8516d52450fb00945",
         "BSD-3-clause", '/usr/share/'),
    _src("db5.3-doc", "5.3.28+dfsg2-1",
         "436a0b88b1b0ba35333d5a0220dfa918ab0a3de72ac17116b446de56754d43bd",
         "Sleepycat (BSD-3-clause-like)", '/usr/share/'),
    _src("lazarus-doc-2.2", "2.2.6+dfsg2-2",
         "cfe9fe06ce59bdf1f435ce1a35f8335004723b2d5897188d7eb4464432e6bc8c",
         "LGPL-2+ with linking exception", '/usr/share/'),
    _src("fp-docs-3.2.2", "3.2.2+dfsg-20",
         "17dafb8b4dc5098bad1373dea7a414dacaef9017b6085c41f28b4e455da2b04e",
         "GPL-2+", '/usr/share/'),
    _src("scala-doc", "2.11.12-5",
         "9937bcdc5a21c74ab40d4290228076dd119c166d3f032068f3755a559b185cce",
         "Apache-2.0", '/usr/share/'),
    _src("singular-doc", "1:4.3.1-p3+ds-2",
         "2914f83ac8d92790a6337daeed7cdbe1024c3ac420edbe48a56e7018edc51e22",
         "GPL-2 or GPL-3", '/usr/share/info/'),
    _src("maxima-doc", "5.46.0-11",
         "01a726b693a7e465a62040ac5ade4762194d7553524231d77cd1fcd4a69a75b9",
         "GPL-2+", '/usr/share/info/'),
    _src("octave-doc", "7.3.0-2",
         "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5",
         "GPL-3+", '/usr/share/info/'),
    _src("r-doc-html", "4.2.2.20221110-2",
         "2c615dd386993a440b80fd4e9060318386e31fbe47f5be65f295f5fb34002c5c",
         "GPL-2", '/usr/share/'),
    _src("gap-doc", "4.12.1-2",
         "ceaaee8ae7870d71353d7846ac39575a9a32f87b36928b8037139a54938bd7ab",
         "GPL-2+", '/usr/share/'),
    _src("lilypond-doc-html", "2.24.1-2",
         "be9fb743e58bd5ad4710146fe05e7c5f447fe4559e42c6acef1916d53e4bec60",
         "GFDL-1.3+ (no invariant sections)", '/usr/share/'),
    _src("exim4-doc-html", "4.96-1",
         "f0613395fd73c3c278b619c8162c5a183e7874cbfdebe3614b4b3339d5d8a120",
         "GPL-2+", '/usr/share/'),
    _src("bind9-doc", "1:9.18.49-1~deb12u3",
         "7a3282f365576e58378b242ea7e8bd65ce227e94dd4abe8acbb5874873e7265e",
         "MPL-2.0", '/usr/share/'),
    _src("nginx-doc", "1.22.1-9+deb12u11",
         "84e43b66bc84734682ccea8d3e74bff600918c6242fce52d391711f0ff1bba1a",
         "BSD-2-clause", '/usr/share/'),
    _src("varnish-doc", "7.1.1-2+deb12u1",
         "551cfc6619d98fbca88f97e2486ecdf6fc02366a1b401338f5ea268e641ca7b9",
         "BSD-2-clause", '/usr/share/'),
    _src("tcl8.6-doc", "8.6.13+dfsg-2",
         "e6468aa726a0d77f3e61ae4714bcf7c4c4ddd02828388977f765ffdda4935876",
         "Tcl/Tk licence (BSD-like)", '/usr/share/'),
    _src("tk8.6-doc", "8.6.13-2",
         "8e93967b9d5d36e2eff002f27261b93417a7c439a8207932fe8335f0ac84b407",
         "Tcl/Tk licence (BSD-like)", '/usr/share/'),
    _src("guile-3.0-doc", "3.0.8-2",
         "2169d284c252874221e1fe81094de499672606e06210d613d94125c5242c2b95",
         "GFDL-1.3+ (no invariant sections)", '/usr/share/'),
    _src("kicad-doc-en", "6.0.11+dfsg-1",
         "20dbe9acb2e6f38d49bd742d4b71bee2dc3e7dbd8c54a7a45ad05a742e5ae834",
         "GPL-3+ or CC-BY-3.0+", '/usr/share/'),
    _src("gnuplot-doc", "5.4.4+dfsg1-2",
         "73fe1816a296594cf6a1d38528f8d740fd650f57a2cb62e029f7920fcd5b31f0",
         "gnuplot licence", '/usr/share/'),
    _src("inkscape-tutorials", "1.2.2-2+deb12u1",
         "e3be7dc12415971d3f427f98072a86f14a76c0107edb8e297f648f7614dc6985",
         "GPL-2+", '/usr/share/'),
    _src("cppreference-doc-en-html", "20170409-2",
         "603e9b7ef33d08b957e287b2b1f429f2338bccf75144f91b7c9e51d3cb6a14e2",
         "CC-BY-SA-3.0 or GFDL", '/usr/share/'),
    _src("opencv-doc", "4.6.0+dfsg-12",
         "4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
         "Apache-2.0", '/usr/share/'),
    _src("petsc3.18-doc", "3.18.5+dfsg1-1",
         "e2d9c81101c586b1467b3ca6dc341e9902f34a8dba618be3a840bad02db5c3da",
         "BSD-2-clause", '/usr/share/'),
    _src("groovy-doc", "2.4.21-8",
         "e3403555a79eb9674e1fb497fb37dfbe1de02f275bb2233b1be2b668f3c03ddd",
         "Apache-2.0", '/usr/share/'),
    _src("derby-doc", "10.14.2.0-2",
         "5a8b235e539d46df26749c36de667d469d04b86db90121439d5757ec30e0dfad",
         "Apache-2.0", '/usr/share/'),
    _src("libapache-poi-java-doc", "4.0.1-4",
         "51098233529bb5dc8295af145c220d9e6428661c3cbb189c87cb8919b03ce9d4",
         "Apache-2.0", '/usr/share/'),
    _src("libgtk-4-doc", "4.8.3+ds-2+deb12u1",
         "24e092c566ad635e9b8f5e04a29b580b7c9b9a4d93026633fd4709b282c64788",
         "LGPL-2.1+", '/usr/share/'),
    _src("libgtkmm-3.0-doc", "3.24.7-1",
         "8d22c4689f422d49d3a6b6afe3638afe4a6a8c27cd4a6fbcf25680ffdfc64c2a",
         "LGPL-2.1+", '/usr/share/'),
    _src("efl-doc", "1.26.3-1",
         "32a080e42cead636d63207ad46e05c314b22e2f3cd9cd21c3f8aa108b41c8b75",
         "BSD-2-clause / LGPL-2.1", '/usr/share/'),
    _src("pike8.0-doc", "8.0.1738-1",
         "8211fd6a7f2097bef6a6407bbbcaf8ecd451a409e4a367a010baa77f64019af5",
         "GPL-2 / LGPL-2.1 / MPL-1.1", '/usr/share/'),
    _src("libopenjfx-java-doc", "11.0.11+1-3",
         "99a6a24759e74b659a8a51e2e6d8c03c53f7b27ac6523b26d0c5d9a5aae52e42",
         "GPL-2 with Classpath exception", '/usr/share/'),
    _src("gdcm-doc", "3.0.21-1",
         "9b494b9e6b0e6e7e972c2ffc7c061314ca8ed5a4f16e2abfbb33a42bd2d733d9",
         "BSD-3-clause", '/usr/share/'),
    _src("dict-gcide", "0.48.5+nmu2",
         "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
         "GPL-3+", '/usr/share/dictd/'),
    _src("dict-wn", "1:3.0-37",
         "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
         "WordNet 3.0 licence", '/usr/share/dictd/'),
    _src("dict-foldoc", "20230119-1",
         "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
         "GFDL-1.1+", '/usr/share/dictd/'),
    _src("dict-jargon", "4.4.7-3.1",
         "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
         "public domain", '/usr/share/dictd/'),
    _src("fortunes", "1:1.99.1-7.3",
         "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
         "BSD-4-clause-UC and others (see copyright)", "/usr/share/games/fortunes/",
         exclude=(r"\.dat$", r"\.u8$"), fortune=True),
)  # fmt: skip


def corpus_dir(cache_dir: Path | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "corpora" / f"{NAME}-{BUILD}"


def is_installed(cache_dir: Path | None = None) -> bool:
    return (corpus_dir(cache_dir) / MARKER).is_file()


def token_paths(cache_dir: Path | None = None) -> tuple[Path, Path, Path]:
    """``(train.u16.bin, val.u16.bin, tokenizer.json)`` of the installed corpus."""
    folder = corpus_dir(cache_dir)
    return (folder / "tokens" / "train.u16.bin", folder / "tokens" / "val.u16.bin",
            folder / TOKENIZER_FILE)


def ensure_installed(cache_dir: Path | None = None,
                     sources: tuple[DebSource, ...] | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """The corpus folder, building it first if it is not complete (see the module docstring).

    Raises:
        PackageUnavailableError: a package could not be fetched or does not match its pin.
    """
    target = corpus_dir(cache_dir)
    if (target / MARKER).is_file():
        return target
    root = resolve_cache_dir(cache_dir)
    build_corpus(target, root / "downloads" / "debian", SOURCES if sources is None else sources,
                 extract_cache=root / "build" / NAME, log=log)
    return target


def install_corpus(cache_dir: Path | None = None) -> Path:
    """``poetx data install debian-en``: build (or find) the corpus and print its summary."""
    target = corpus_dir(cache_dir)
    if is_installed(cache_dir):
        print(f"{NAME} already installed: {target}")
    else:
        print(f"installing {NAME}: {len(SOURCES)} Debian packages, cleaned, de-duplicated, "
              "split and tokenized (about 20 minutes on 2 cores; 2.4 GB of packages)")
        ensure_installed(cache_dir)
    manifest = json.loads((target / MANIFEST).read_text())
    for split in ("train", "val"):
        info = manifest["splits"][split]
        print(f"  {split}: {info['documents']:,} documents, {info['chars'] / 1e6:.1f} M "
              f"characters, {info['tokens'] / 1e6:.2f} M tokens")
    print(f"  folder {target}")
    return target


def _extract_job(args: tuple[DebSource, Path, Path | None]) -> list[tuple[str, str]]:
    """Documents of one package (ids prefixed ``<package>:``), from the extraction cache when
    an earlier build read the same file with the same rules."""
    source, deb, cache = args
    key = hashlib.sha256(f"{source.pin.sha256}|{source.rules!r}|{EXTRACT_VERSION}".encode())
    path = None if cache is None else cache / f"{source.pin.name}-{key.hexdigest()[:16]}.jsonl.gz"
    if path is not None and path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [(row["id"], row["text"]) for row in map(json.loads, f)]
    docs = [(f"{source.pin.name}:{doc_id}", text)
            for doc_id, text in package_documents(deb, source.rules)]
    if path is not None:
        def write(tmp: Path) -> None:
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
                for doc_id, text in docs:
                    f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        write_with(path, write)
    return docs


def id_fraction(doc_id: str) -> float:
    """A number in [0, 1) fixed by the document id (the split and order key)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[tuple[str, str]], val_fraction: float
                    ) -> dict[str, list[tuple[str, str]]]:
    """Documents with ``id_fraction(id) < val_fraction`` to ``"val"``, the rest to ``"train"``;
    each split ordered by the sha256 of ``"order:" + id`` (a shuffle that depends on nothing
    but the ids)."""
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for doc in docs:
        splits["val" if id_fraction(doc[0]) < val_fraction else "train"].append(doc)
    for split in splits.values():
        split.sort(key=lambda doc: hashlib.sha256(("order:" + doc[0]).encode()).digest())
    return splits


def _spread_sample(texts: list[str], max_chars: int) -> Iterator[str]:
    """Every k-th text, k chosen so that about ``max_chars`` characters are yielded."""
    total = sum(len(t) for t in texts)
    stride = max(1, round(total / max_chars))
    yield from texts[::stride]


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")


def build_corpus(target: Path, downloads: Path, sources: tuple[DebSource, ...],
                 extract_cache: Path | None = None, workers: int | None = None,
                 vocab_size: int = VOCAB_SIZE, val_fraction: float = VAL_FRACTION,
                 tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
                 log: Callable[[str], None] = print) -> dict:
    """Build the corpus folder ``target`` from ``sources`` (steps of the module docstring).

    The folder appears complete or not at all: everything is written into a temporary sibling
    that is renamed into place at the end. Returns the manifest.
    """
    from poetx.data.dataset import tokenize_documents  # torch-heavy module, imported late

    if not sources:
        raise ValueError(f"{NAME}: no sources to build from")
    start = time.perf_counter()
    debs = []
    for source in sources:
        debs.append(fetch_deb(source.pin, downloads))
    log(f"  {len(debs)} packages verified in {downloads} ({time.perf_counter() - start:.0f} s)")
    workers = workers or min(len(debs), os.cpu_count() or 1)
    docs: list[tuple[str, str]] = []
    per_source: dict[str, dict] = {}
    jobs = [(source, deb, extract_cache) for source, deb in zip(sources, debs, strict=True)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_extract_job, jobs) if workers > 1 else map(_extract_job, jobs)
        for source, extracted in zip(sources, results, strict=True):
            per_source[source.pin.name] = {
                "version": source.pin.version, "sha256": source.pin.sha256,
                "licence": source.licence, "documents": len(extracted),
                "chars": sum(len(t) for _, t in extracted),
            }
            docs.extend(extracted)
    log(f"  extracted {len(docs):,} documents, {sum(len(t) for _, t in docs) / 1e6:.1f} M "
        f"characters ({time.perf_counter() - start:.0f} s)")
    keep, stats = deduplicate([text for _, text in docs])
    for name in per_source:
        per_source[name]["documents_kept"] = 0
        per_source[name]["chars_kept"] = 0
    docs = [docs[i] for i in keep]
    for doc_id, text in docs:
        name = doc_id.split(":", 1)[0]
        per_source[name]["documents_kept"] += 1
        per_source[name]["chars_kept"] += len(text)
    log(f"  de-duplicated: {stats.exact:,} exact and {stats.near:,} near duplicates removed, "
        f"{stats.kept:,} documents kept ({time.perf_counter() - start:.0f} s)")
    splits = split_documents(docs, val_fraction)
    del docs
    for split, split_docs in splits.items():
        if not split_docs:
            raise ValueError(f"{NAME}: the {split} split is empty; the sources hold too few "
                             f"documents for a validation fraction of {val_fraction}")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        (staging / "text").mkdir()
        (staging / "tokens").mkdir()
        train_texts = [text for _, text in splits["train"]]
        tok = train_tokenizer(_spread_sample(train_texts, tokenizer_sample_chars), vocab_size)
        tok.save(str(staging / TOKENIZER_FILE))
        log(f"  tokenizer trained, vocabulary {tok.get_vocab_size(with_added_tokens=True)} "
            f"({time.perf_counter() - start:.0f} s)")
        manifest_splits = {}
        for split, split_docs in splits.items():
            _write_jsonl(staging / "text" / f"{split}.jsonl", split_docs)
            ids = tokenize_documents((text for _, text in split_docs), tok)
            if ids.dtype != np.uint16:
                raise ValueError(f"vocabulary {vocab_size} does not fit uint16 token files")
            token_file = staging / "tokens" / f"{split}.u16.bin"
            ids.astype("<u2").tofile(token_file)
            manifest_splits[split] = {
                "documents": len(split_docs),
                "chars": sum(len(t) for _, t in split_docs),
                "tokens": int(len(ids)),
                "text_sha256": sha256_file(staging / "text" / f"{split}.jsonl"),
                "tokens_sha256": sha256_file(token_file),
            }
            log(f"  {split}: {len(split_docs):,} documents, {len(ids) / 1e6:.2f} M tokens "
                f"({time.perf_counter() - start:.0f} s)")
        manifest = {
            "name": NAME, "build": BUILD, "val_fraction": val_fraction,
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "tokenizer_sha256": sha256_file(staging / TOKENIZER_FILE),
            "dedup": {"documents": stats.documents, "exact": stats.exact, "near": stats.near},
            "splits": manifest_splits, "sources": per_source,
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the corpus is not
        (staging / MARKER).write_text(json.dumps({"build": BUILD}) + "\n")
        if target.exists():
            if (target / MARKER).is_file():  # a concurrent build finished first
                return json.loads((target / MANIFEST).read_text())
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
