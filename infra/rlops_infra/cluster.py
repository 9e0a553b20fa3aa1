"""The cluster: EKS with a system node group and GPU managed node groups (scale from zero, tainted), the
NVIDIA device plugin and the cluster autoscaler; or an existing cluster reached through a kubeconfig."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_eks as eks
import pulumi_kubernetes as k8s

from rlops_infra import charts
from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import GPU_NODE_LABEL, GPU_RESOURCE, GPU_TAINT, NODE_GROUP_LABEL

NODE_POLICIES = (
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
)
AUTOSCALER_SA = "cluster-autoscaler"
CSI_DRIVERS = (
    # (add-on, its controller's service account, the AWS-managed policy it needs)
    (
        "aws-ebs-csi-driver",
        "ebs-csi-controller-sa",
        "arn:aws:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy",
    ),
    (
        "aws-efs-csi-driver",
        "efs-csi-controller-sa",
        "arn:aws:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy",
    ),
)
"""EBS for single-writer volumes (Prometheus), EFS for the shared data and model volumes."""


@dataclass(frozen=True)
class ClusterArgs:
    cluster: cfg.Cluster
    cluster_name: str
    """Name of the EKS cluster (unused for kubeconfig)."""
    tags: dict[str, str] = field(default_factory=dict)


def gpu_node_group_tags(cluster_name: str, group: cfg.NodeGroup) -> dict[str, str]:
    """Tags that tell the cluster autoscaler what a node of an empty group would offer (scale from zero)."""
    template = "k8s.io/cluster-autoscaler/node-template"
    return {
        f"k8s.io/cluster-autoscaler/{cluster_name}": "owned",
        "k8s.io/cluster-autoscaler/enabled": "true",
        f"{template}/label/{GPU_NODE_LABEL}": "true",
        f"{template}/label/{NODE_GROUP_LABEL}": group.name,
        f"{template}/taint/{GPU_RESOURCE}": f"{GPU_TAINT['value']}:{GPU_TAINT['effect']}",
        f"{template}/resources/{GPU_RESOURCE}": str(group.gpus_per_node),
    }


def device_plugin_values() -> dict[str, Any]:
    # The chart's default affinity already selects nodes labelled nvidia.com/gpu.present=true and its
    # default tolerations cover the GPU taint; only the container's resources are added.
    return {
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"},
        }
    }


def autoscaler_values(cluster_name: str, region: str) -> dict[str, Any]:
    return {
        "cloudProvider": "aws",
        "awsRegion": region,
        "autoDiscovery": {"clusterName": cluster_name},
        "rbac": {"serviceAccount": {"create": True, "name": AUTOSCALER_SA}},
        "extraArgs": {
            "balance-similar-node-groups": "true",
            "expander": "least-waste",
            # GPU nodes are expensive: give them back soon after their pods finish.
            "scale-down-unneeded-time": "5m",
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "300Mi"},
            "limits": {"cpu": "500m", "memory": "600Mi"},
        },
    }


def autoscaler_policy(cluster_name: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    "eks:DescribeNodegroup",
                ],
                "Resource": "*",
            },
            {
                "Effect": "Allow",
                "Action": [
                    "autoscaling:SetDesiredCapacity",
                    "autoscaling:TerminateInstanceInAutoScalingGroup",
                ],
                "Resource": "*",
                "Condition": {
                    "StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"}
                },
            },
        ],
    }


def _assume(service: str, actions: list[str]) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": actions}],
        }
    )


class Cluster(Component):
    """Outputs ``provider``: the Kubernetes provider every other component deploys through."""

    provider: k8s.Provider

    def __init__(self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Cluster", name, opts)
        c = args.cluster
        if c.eks is not None:
            self._eks(args, c.eks)
        else:
            self.provider = k8s.Provider(
                f"{name}-provider",
                kubeconfig=c.kubeconfig,
                context=c.context,
                opts=self.child_opts(),
            )
        if c.gpu_node_groups and c.device_plugin:
            charts.release(
                f"{name}-nvidia-device-plugin",
                charts.NVIDIA_DEVICE_PLUGIN,
                c.device_plugin_chart_version,
                "kube-system",
                device_plugin_values(),
                self.child_opts(provider=self.provider),
            )
        self.register_outputs({"provider": self.provider})

    def _eks(self, args: ClusterArgs, e: cfg.Eks) -> None:
        name, cname = self.name, args.cluster_name
        role = aws.iam.Role(
            f"{name}-node-role",
            assume_role_policy=_assume("ec2.amazonaws.com", ["sts:AssumeRole"]),
            tags=args.tags,
            opts=self.child_opts(),
        )
        attachments = [
            aws.iam.RolePolicyAttachment(
                f"{name}-node-policy-{i}", role=role.name, policy_arn=arn, opts=self.child_opts()
            )
            for i, arn in enumerate(NODE_POLICIES)
        ]
        cluster = eks.Cluster(
            f"{name}-eks",
            name=cname,
            version=e.kubernetes_version,
            skip_default_node_group=True,
            instance_roles=[role],
            authentication_mode=eks.AuthenticationMode.API,
            vpc_id=e.vpc_id,
            subnet_ids=e.subnet_ids or None,
            tags=args.tags,
            opts=self.child_opts(depends_on=attachments),
        )
        system = e.system_nodes
        eks.ManagedNodeGroup(
            f"{name}-system",
            cluster=cluster,
            node_role=role,
            operating_system=eks.OperatingSystem.AL2023,
            instance_types=system.instance_types,
            capacity_type="ON_DEMAND",
            scaling_config={
                "min_size": system.min_size,
                "max_size": system.max_size,
                "desired_size": system.desired_size,
            },
            disk_size=system.disk_gib,
            labels={NODE_GROUP_LABEL: "system"},
            ignore_scaling_changes=True,
            tags=args.tags,
            opts=self.child_opts(),
        )
        for group in args.cluster.gpu_node_groups:
            eks.ManagedNodeGroup(
                f"{name}-gpu-{group.name}",
                cluster=cluster,
                node_role=role,
                operating_system=eks.OperatingSystem.AL2023,
                # The EKS-optimised accelerated AMI: NVIDIA driver and container toolkit preinstalled.
                gpu=True,
                instance_types=group.instance_types,
                capacity_type="SPOT" if group.capacity == "spot" else "ON_DEMAND",
                scaling_config={
                    "min_size": group.min_size,
                    "max_size": group.max_size,
                    "desired_size": group.desired_size,
                },
                disk_size=group.disk_gib,
                labels={GPU_NODE_LABEL: "true", NODE_GROUP_LABEL: group.name},
                taints=[{"key": GPU_TAINT["key"], "value": GPU_TAINT["value"], "effect": "NO_SCHEDULE"}],
                tags={**args.tags, **gpu_node_group_tags(cname, group)},
                ignore_scaling_changes=True,
                opts=self.child_opts(),
            )
        self.provider = k8s.Provider(
            f"{name}-provider", kubeconfig=cluster.kubeconfig_json, opts=self.child_opts()
        )
        # The cluster autoscaler gets its AWS permissions through EKS Pod Identity (no OIDC provider).
        agent = aws.eks.Addon(
            f"{name}-pod-identity-agent",
            cluster_name=cname,
            addon_name="eks-pod-identity-agent",
            opts=self.child_opts(depends_on=[cluster]),
        )
        for addon, account, policy in CSI_DRIVERS:
            csi_role = aws.iam.Role(
                f"{name}-{addon}-role",
                assume_role_policy=_assume("pods.eks.amazonaws.com", ["sts:AssumeRole", "sts:TagSession"]),
                tags=args.tags,
                opts=self.child_opts(),
            )
            attached = aws.iam.RolePolicyAttachment(
                f"{name}-{addon}-policy", role=csi_role.name, policy_arn=policy, opts=self.child_opts()
            )
            aws.eks.Addon(
                f"{name}-{addon}",
                cluster_name=cname,
                addon_name=addon,
                pod_identity_associations=[{"role_arn": csi_role.arn, "service_account": account}],
                opts=self.child_opts(depends_on=[cluster, agent, attached]),
            )
        as_role = aws.iam.Role(
            f"{name}-autoscaler-role",
            assume_role_policy=_assume("pods.eks.amazonaws.com", ["sts:AssumeRole", "sts:TagSession"]),
            tags=args.tags,
            opts=self.child_opts(),
        )
        aws.iam.RolePolicy(
            f"{name}-autoscaler-policy",
            role=as_role.id,
            policy=json.dumps(autoscaler_policy(cname)),
            opts=self.child_opts(),
        )
        identity = aws.eks.PodIdentityAssociation(
            f"{name}-autoscaler-identity",
            cluster_name=cname,
            namespace="kube-system",
            service_account=AUTOSCALER_SA,
            role_arn=as_role.arn,
            opts=self.child_opts(depends_on=[cluster, agent]),
        )
        charts.release(
            f"{name}-cluster-autoscaler",
            charts.CLUSTER_AUTOSCALER,
            e.autoscaler_chart_version,
            "kube-system",
            autoscaler_values(cname, e.region),
            self.child_opts(depends_on=[identity], provider=self.provider),
        )
