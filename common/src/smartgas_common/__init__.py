"""SmartGas shared definitions, read alike by the consumer and the publisher.

``gas``: the fluids, the built-in gases and mixtures, and the parser of the fleet file's ``gases`` section;
``eos``: the one boundary to CoolProp's reference equations of state; ``table``: compressibility tabulated
per gas for the per-reading path; ``content``: real-gas content (moles, kg, standard m³, fill %) and the
state of liquefied gases; ``const``: units, reference conditions and the physics envelope.
"""
