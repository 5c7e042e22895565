"""Scale-out serving on Ray Serve: many engine replicas, several models, one OpenAI endpoint.

``llmc serve ART [ART ...] --replicas N`` (:func:`llmc.runtime.scaleout.deploy.serve_scaleout`)
runs :func:`llmc.runtime.scaleout.application.build_application`: an ingress deployment with the
same FastAPI app as the single-process server (:func:`llmc.runtime.server.app.create_backend_app`
over :class:`~llmc.runtime.scaleout.ingress.RayBackend`), one engine deployment per model
(:class:`~llmc.runtime.scaleout.replica.EngineReplica`, routed by
:class:`~llmc.runtime.scaleout.router.PrefixAffinityRouter`) and a metrics hub. Needs the ``ray``
extra (``pip install 'llmc-toolchain[ray]'``); see docs/scale-out.md.
"""
